//! Address management and input validation: pure logic, no I/O.
//!
//! Addresses in use are not stored separately: they are the addresses of the endpoints on a
//! network, so allocation state can never drift from the endpoints themselves.

use std::{collections::BTreeSet, net::Ipv4Addr};

use ipnetwork::Ipv4Network;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("invalid subnet {input:?}: {reason}")]
    InvalidSubnet { input: String, reason: String },
    #[error("invalid IPv4 address {input:?} for {what}")]
    InvalidAddress { input: String, what: &'static str },
    #[error("{what} {ip} is outside subnet {subnet}")]
    OutsideSubnet {
        what: &'static str,
        ip: Ipv4Addr,
        subnet: Ipv4Network,
    },
    #[error("{ip} is the {role} address of subnet {subnet} and cannot be given to an endpoint")]
    Reserved {
        ip: Ipv4Addr,
        role: &'static str,
        subnet: Ipv4Network,
    },
    #[error("gateway {ip} is the {role} address of subnet {subnet}")]
    BadGateway {
        ip: Ipv4Addr,
        role: &'static str,
        subnet: Ipv4Network,
    },
    #[error("address {ip} is already used by endpoint {owner}")]
    Taken { ip: Ipv4Addr, owner: String },
    #[error("subnet {subnet} of network {network} has no free address left")]
    Exhausted {
        subnet: Ipv4Network,
        network: String,
    },
}

/// Smallest prefix length accepted (/8) and largest (/30: network, gateway, one endpoint,
/// broadcast). Larger pools than /8 on one host serve nobody; /31 and /32 leave no endpoint.
pub const MIN_PREFIX: u8 = 8;
pub const MAX_PREFIX: u8 = 30;

/// Parses a subnet in canonical form (`10.1.0.0/24`, not `10.1.0.7/24`).
pub fn parse_subnet(input: &str) -> Result<Ipv4Network, IpamError> {
    let invalid = |reason: String| IpamError::InvalidSubnet {
        input: input.to_owned(),
        reason,
    };
    let (addr, prefix) = input
        .split_once('/')
        .ok_or_else(|| invalid("expected ADDRESS/PREFIX, for example 10.1.0.0/24".into()))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| invalid(format!("{addr:?} is not an IPv4 address")))?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| invalid(format!("{prefix:?} is not a prefix length")))?;
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
        return Err(invalid(format!(
            "prefix length must be between /{MIN_PREFIX} and /{MAX_PREFIX}"
        )));
    }
    let net = Ipv4Network::new(addr, prefix).map_err(|e| invalid(e.to_string()))?;
    if net.network() != addr {
        return Err(invalid(format!(
            "host bits set; the network address is {}/{prefix}",
            net.network()
        )));
    }
    Ok(net)
}

pub fn parse_addr(input: &str, what: &'static str) -> Result<Ipv4Addr, IpamError> {
    input.parse().map_err(|_| IpamError::InvalidAddress {
        input: input.to_owned(),
        what,
    })
}

/// The role of an address that no endpoint may have, if it has one.
fn reserved_role(subnet: Ipv4Network, ip: Ipv4Addr) -> Option<&'static str> {
    if ip == subnet.network() {
        Some("network")
    } else if ip == subnet.broadcast() {
        Some("broadcast")
    } else {
        None
    }
}

/// The gateway of a new network: the one asked for (checked), or the subnet's first host.
pub fn choose_gateway(
    subnet: Ipv4Network,
    requested: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, IpamError> {
    let Some(ip) = requested else {
        return Ok(Ipv4Addr::from(u32::from(subnet.network()) + 1));
    };
    if !subnet.contains(ip) {
        return Err(IpamError::OutsideSubnet {
            what: "gateway",
            ip,
            subnet,
        });
    }
    if let Some(role) = reserved_role(subnet, ip) {
        return Err(IpamError::BadGateway { ip, role, subnet });
    }
    Ok(ip)
}

/// The first subnet in `existing` that overlaps `subnet`, with its owner's name.
pub fn overlapping<'a>(
    subnet: Ipv4Network,
    existing: impl IntoIterator<Item = (&'a str, Ipv4Network)>,
) -> Option<(&'a str, Ipv4Network)> {
    existing
        .into_iter()
        .find(|(_, other)| other.overlaps(subnet))
}

/// A network's address pool as the allocator sees it.
pub struct Pool<'a> {
    pub network: &'a str,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    /// Addresses in use, with the endpoint that has each.
    pub used: &'a [(Ipv4Addr, String)],
}

impl Pool<'_> {
    /// The requested address if it is free and assignable, otherwise the lowest free one.
    pub fn allocate(&self, requested: Option<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
        let subnet = self.subnet;
        if let Some(ip) = requested {
            if !subnet.contains(ip) {
                return Err(IpamError::OutsideSubnet {
                    what: "address",
                    ip,
                    subnet,
                });
            }
            if let Some(role) = reserved_role(subnet, ip) {
                return Err(IpamError::Reserved { ip, role, subnet });
            }
            if ip == self.gateway {
                return Err(IpamError::Reserved {
                    ip,
                    role: "gateway",
                    subnet,
                });
            }
            if let Some((_, owner)) = self.used.iter().find(|(used, _)| *used == ip) {
                return Err(IpamError::Taken {
                    ip,
                    owner: owner.clone(),
                });
            }
            return Ok(ip);
        }
        let used: BTreeSet<u32> = self.used.iter().map(|(ip, _)| u32::from(*ip)).collect();
        let first = u32::from(subnet.network()) + 1;
        let last = u32::from(subnet.broadcast()) - 1;
        (first..=last)
            .find(|n| *n != u32::from(self.gateway) && !used.contains(n))
            .map(Ipv4Addr::from)
            .ok_or_else(|| IpamError::Exhausted {
                subnet,
                network: self.network.to_owned(),
            })
    }
}

/// Why a name is refused, if it is. Names become parts of namespace paths and are typed in
/// shells, so they are kept to a safe alphabet.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > 32 || !ok_start || !ok_chars {
        return Err(format!(
            "invalid {kind} name {name:?}: use 1-32 characters from a-z, A-Z, 0-9, '-', '_', '.', starting with a letter or digit"
        ));
    }
    Ok(())
}

/// MTU bounds: IPv4's minimum and the largest veth MTU.
pub const MIN_MTU: u32 = 68;
pub const MAX_MTU: u32 = 65_535;

pub fn check_mtu(mtu: u32) -> Result<(), String> {
    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(format!(
            "invalid MTU {mtu}: must be between {MIN_MTU} and {MAX_MTU}"
        ));
    }
    Ok(())
}

/// Locally administered MACs derived from the endpoint address, as Docker does, so they are
/// stable across rebuilds. The second byte tells the endpoint side from the host side.
pub fn endpoint_mac(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x02, 0x4e, a, b, c, d]
}

pub fn host_mac(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x02, 0x48, a, b, c, d]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_must_be_canonical_and_sized() {
        assert!(parse_subnet("10.1.0.0/24").is_ok());
        for bad in [
            "10.1.0.5/24",
            "10.1.0.0",
            "10.1.0.0/31",
            "10.0.0.0/7",
            "x/24",
            "10.1.0.0/x",
        ] {
            assert!(parse_subnet(bad).is_err(), "{bad} accepted");
        }
        let err = parse_subnet("10.1.0.5/24").unwrap_err().to_string();
        assert!(err.contains("10.1.0.0/24"), "{err}");
    }

    #[test]
    fn gateway_defaults_to_first_host_and_is_checked() {
        let net = parse_subnet("10.1.0.0/24").unwrap();
        assert_eq!(choose_gateway(net, None).unwrap(), ip("10.1.0.1"));
        assert_eq!(
            choose_gateway(net, Some(ip("10.1.0.254"))).unwrap(),
            ip("10.1.0.254")
        );
        assert!(choose_gateway(net, Some(ip("10.1.0.0"))).is_err());
        assert!(choose_gateway(net, Some(ip("10.1.0.255"))).is_err());
        assert!(choose_gateway(net, Some(ip("10.2.0.1"))).is_err());
    }

    #[test]
    fn overlap_is_found_both_ways() {
        let a = parse_subnet("10.1.0.0/16").unwrap();
        let b = parse_subnet("10.1.2.0/24").unwrap();
        let c = parse_subnet("10.2.0.0/24").unwrap();
        assert_eq!(overlapping(b, [("a", a)]).map(|(n, _)| n), Some("a"));
        assert_eq!(overlapping(a, [("b", b)]).map(|(n, _)| n), Some("b"));
        assert!(overlapping(c, [("a", a), ("b", b)]).is_none());
    }

    #[test]
    fn allocation_skips_reserved_and_used_and_reuses_freed() {
        let subnet = parse_subnet("10.1.0.0/29").unwrap(); // .1 gw, .2-.6 hosts
        let mut used = vec![
            (ip("10.1.0.2"), "a".to_owned()),
            (ip("10.1.0.3"), "b".to_owned()),
        ];
        let pool = |used: &[(Ipv4Addr, String)]| {
            Pool {
                network: "n",
                subnet,
                gateway: ip("10.1.0.1"),
                used,
            }
            .allocate(None)
        };
        assert_eq!(pool(&used).unwrap(), ip("10.1.0.4"));
        used.remove(0);
        assert_eq!(pool(&used).unwrap(), ip("10.1.0.2"));
        let full: Vec<_> = (2..=6)
            .map(|n| (Ipv4Addr::new(10, 1, 0, n), format!("e{n}")))
            .collect();
        assert!(matches!(pool(&full), Err(IpamError::Exhausted { .. })));
    }

    #[test]
    fn requested_addresses_are_checked() {
        let subnet = parse_subnet("10.1.0.0/24").unwrap();
        let used = vec![(ip("10.1.0.9"), "web".to_owned())];
        let pool = Pool {
            network: "n",
            subnet,
            gateway: ip("10.1.0.1"),
            used: &used,
        };
        assert_eq!(
            pool.allocate(Some(ip("10.1.0.50"))).unwrap(),
            ip("10.1.0.50")
        );
        let taken = pool.allocate(Some(ip("10.1.0.9"))).unwrap_err();
        assert!(taken.to_string().contains("web"), "{taken}");
        for reserved in ["10.1.0.0", "10.1.0.1", "10.1.0.255"] {
            assert!(matches!(
                pool.allocate(Some(ip(reserved))),
                Err(IpamError::Reserved { .. })
            ));
        }
        assert!(matches!(
            pool.allocate(Some(ip("10.9.0.5"))),
            Err(IpamError::OutsideSubnet { .. })
        ));
    }

    #[test]
    fn names_and_mtus() {
        assert!(check_name("endpoint", "web-1.a_b").is_ok());
        for bad in ["", "-x", "a/b", "a b", &"x".repeat(33)] {
            assert!(check_name("endpoint", bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_mtu(1500).is_ok());
        assert!(check_mtu(10).is_err());
        assert!(check_mtu(70_000).is_err());
    }

    #[test]
    fn macs_are_local_unicast_and_distinct() {
        let a = endpoint_mac(ip("10.1.0.2"));
        let h = host_mac(ip("10.1.0.2"));
        assert_ne!(a, h);
        for mac in [a, h] {
            assert_eq!(mac[0] & 0x01, 0, "multicast bit set");
            assert_eq!(mac[0] & 0x02, 0x02, "not locally administered");
        }
    }
}
