//! The decisions both cluster stores make, as pure functions: checking and defining an overlay
//! network (conflicts, overlaps, the VNI), and choosing a host's subnet. A store reads what it
//! holds, asks these functions, and writes the answer back only if nothing changed meanwhile
//! (one transaction in the embedded store, a compare-and-swap in etcd).

use std::collections::BTreeSet;

use ipnetwork::Ipv4Network;

use super::{ClusterError, Lease, OverlayNetwork, Result};
use crate::ipam;

/// The largest VNI: VXLAN's identifier is 24 bits. VNI 0 is never handed out.
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// The longest per-host subnet: like a local network, it needs a network, a gateway, one
/// endpoint and a broadcast address.
pub const MAX_SUBNET_LEN: u8 = ipam::MAX_PREFIX;

/// Longest host name accepted (a DNS name's limit).
const MAX_HOST_LEN: usize = 253;

/// Checks a definition on its own: the name, a canonical pool of a sensible size, a subnet
/// length inside it, the MTU.
pub fn check_definition(
    name: &str,
    pool: Ipv4Network,
    subnet_len: u8,
    mtu: Option<u32>,
) -> Result<()> {
    let invalid = |reason: String| ClusterError::InvalidNetwork {
        name: name.to_owned(),
        reason,
    };
    ipam::check_name("overlay network", name).map_err(&invalid)?;
    if pool.ip() != pool.network() {
        return Err(invalid(format!(
            "pool {pool} has host bits set; the network address is {}/{}",
            pool.network(),
            pool.prefix()
        )));
    }
    if pool.prefix() < ipam::MIN_PREFIX {
        return Err(invalid(format!(
            "pool {pool} is larger than /{}",
            ipam::MIN_PREFIX
        )));
    }
    if !(pool.prefix()..=MAX_SUBNET_LEN).contains(&subnet_len) {
        return Err(invalid(format!(
            "subnet length /{subnet_len} must be between the pool's /{} and /{MAX_SUBNET_LEN}",
            pool.prefix()
        )));
    }
    if let Some(mtu) = mtu {
        ipam::check_mtu(mtu).map_err(&invalid)?;
    }
    Ok(())
}

/// What [`define`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Definition {
    /// The network is already defined this way: nothing to write.
    Stored(OverlayNetwork),
    /// A new network, VNI chosen: to be written.
    New(OverlayNetwork),
}

/// Defines `name` against the networks `existing` in the store (see
/// [`super::ClusterStore::define_network`] for the rules).
pub fn define(
    existing: &[OverlayNetwork],
    name: &str,
    pool: Ipv4Network,
    subnet_len: u8,
    mtu: Option<u32>,
) -> Result<Definition> {
    check_definition(name, pool, subnet_len, mtu)?;
    if let Some(stored) = existing.iter().find(|n| n.name == name) {
        let mut differences = Vec::new();
        if stored.pool != pool {
            differences.push(format!("pool {} is stored, {pool} asked", stored.pool));
        }
        if stored.subnet_len != subnet_len {
            differences.push(format!(
                "subnet length /{} is stored, /{subnet_len} asked",
                stored.subnet_len
            ));
        }
        if let Some(mtu) = mtu
            && stored.mtu != Some(mtu)
        {
            let stored_mtu = stored
                .mtu
                .map_or_else(|| "none".to_owned(), |m| m.to_string());
            differences.push(format!("MTU {stored_mtu} is stored, {mtu} asked"));
        }
        if differences.is_empty() {
            return Ok(Definition::Stored(stored.clone()));
        }
        return Err(ClusterError::NetworkConflict {
            name: name.to_owned(),
            differences: differences.join("; "),
        });
    }
    if let Some(other) = existing.iter().find(|n| n.pool.overlaps(pool)) {
        return Err(ClusterError::PoolOverlap {
            name: name.to_owned(),
            pool,
            other: other.name.clone(),
            other_pool: other.pool,
        });
    }
    let vni = lowest_free_vni(existing.iter().map(|n| n.vni)).ok_or_else(|| {
        ClusterError::VniExhausted {
            name: name.to_owned(),
        }
    })?;
    Ok(Definition::New(OverlayNetwork {
        name: name.to_owned(),
        pool,
        subnet_len,
        vni,
        mtu,
    }))
}

/// The lowest VNI from 1 that is not in `used`.
pub fn lowest_free_vni(used: impl IntoIterator<Item = u32>) -> Option<u32> {
    let used: BTreeSet<u32> = used.into_iter().collect();
    let mut candidate = 1;
    for vni in used.range(1..) {
        if *vni != candidate {
            break;
        }
        candidate += 1;
    }
    (candidate <= MAX_VNI).then_some(candidate)
}

/// The caller's idea of a network must be what the store has: a lease taken on a pool that was
/// since redefined would be wrong.
pub fn check_same_network(stored: &OverlayNetwork, asked: &OverlayNetwork) -> Result<()> {
    if stored.pool == asked.pool && stored.subnet_len == asked.subnet_len && stored.vni == asked.vni
    {
        return Ok(());
    }
    Err(ClusterError::NetworkChanged {
        name: stored.name.clone(),
        stored_pool: stored.pool,
        stored_subnet_len: stored.subnet_len,
        stored_vni: stored.vni,
        pool: asked.pool,
        subnet_len: asked.subnet_len,
        vni: asked.vni,
    })
}

/// Host names are written in leases and shown to people: kept to a DNS name's alphabet.
pub fn check_host(host: &str) -> Result<()> {
    let ok = !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host.starts_with(|c: char| c.is_ascii_alphanumeric())
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        return Ok(());
    }
    Err(ClusterError::InvalidHost {
        host: host.to_owned(),
        reason: format!(
            "use 1-{MAX_HOST_LEN} characters from a-z, A-Z, 0-9, '-', '_', '.', starting with a letter or digit"
        ),
    })
}

/// How many subnets of length `subnet_len` the pool holds.
pub fn subnet_count(pool: Ipv4Network, subnet_len: u8) -> u64 {
    1u64 << (subnet_len - pool.prefix())
}

/// The `index`-th subnet of the pool, counting from its start.
fn nth_subnet(pool: Ipv4Network, subnet_len: u8, index: u64) -> Ipv4Network {
    let size = 1u64 << (32 - subnet_len);
    let start = u64::from(u32::from(pool.network())) + index * size;
    let start = u32::try_from(start).expect("a subnet of an IPv4 pool starts inside IPv4");
    Ipv4Network::new(start.into(), subnet_len).expect("subnet_len is at most 32")
}

/// Where `subnet` sits in the pool, if it is one of the pool's subnets of length `subnet_len`.
fn subnet_index(pool: Ipv4Network, subnet_len: u8, subnet: Ipv4Network) -> Option<u64> {
    if subnet.prefix() != subnet_len
        || subnet.ip() != subnet.network()
        || !pool.contains(subnet.network())
        || subnet_len < pool.prefix()
    {
        return None;
    }
    let offset = u32::from(subnet.network()) - u32::from(pool.network());
    Some(u64::from(offset) >> (32 - subnet_len))
}

/// Whether `subnet` is one of the subnets the pool is carved into.
pub fn is_pool_subnet(pool: Ipv4Network, subnet_len: u8, subnet: Ipv4Network) -> bool {
    subnet_index(pool, subnet_len, subnet).is_some()
}

/// `prefer` if it is a free subnet of the pool, else the lowest free one; `None` when the pool
/// is exhausted. Entries of `taken` that are not subnets of the pool are ignored.
pub fn choose_subnet(
    pool: Ipv4Network,
    subnet_len: u8,
    taken: impl IntoIterator<Item = Ipv4Network>,
    prefer: Option<Ipv4Network>,
) -> Option<Ipv4Network> {
    let taken: BTreeSet<u64> = taken
        .into_iter()
        .filter_map(|s| subnet_index(pool, subnet_len, s))
        .collect();
    if let Some(index) = prefer.and_then(|p| subnet_index(pool, subnet_len, p))
        && !taken.contains(&index)
    {
        return Some(nth_subnet(pool, subnet_len, index));
    }
    // The taken indices are sorted: the first gap is the lowest free subnet.
    let mut lowest = 0;
    for index in &taken {
        if *index != lowest {
            break;
        }
        lowest += 1;
    }
    (lowest < subnet_count(pool, subnet_len)).then(|| nth_subnet(pool, subnet_len, lowest))
}

/// What [`plan_lease`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeasePlan {
    /// The host already holds this lease: extend it (and update its VTEP).
    Keep(Lease),
    /// The host holds none: take this free subnet.
    Take(Ipv4Network),
}

/// The subnet `host` gets on `network`, given the unexpired `leases` on it (see
/// [`super::ClusterStore::acquire_lease`] for the rules).
pub fn plan_lease(
    network: &OverlayNetwork,
    leases: &[Lease],
    host: &str,
    prefer: Option<Ipv4Network>,
) -> Result<LeasePlan> {
    let on_network = || leases.iter().filter(|l| l.network == network.name);
    if let Some(own) = on_network()
        .filter(|l| l.host == host)
        .min_by_key(|l| l.subnet)
    {
        return Ok(LeasePlan::Keep(own.clone()));
    }
    choose_subnet(
        network.pool,
        network.subnet_len,
        on_network().map(|l| l.subnet),
        prefer,
    )
    .map(LeasePlan::Take)
    .ok_or_else(|| ClusterError::PoolExhausted {
        network: network.name.clone(),
        pool: network.pool,
        subnet_len: network.subnet_len,
        leased: on_network().count(),
    })
}

/// A subnet as one path element of a store key: `10.244.3.0-24`.
pub fn subnet_key(subnet: Ipv4Network) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn overlay(name: &str, pool: &str, vni: u32) -> OverlayNetwork {
        OverlayNetwork {
            name: name.into(),
            pool: net(pool),
            subnet_len: 24,
            vni,
            mtu: None,
        }
    }

    fn lease(subnet: &str, host: &str) -> Lease {
        Lease {
            network: "ov".into(),
            subnet: net(subnet),
            host: host.into(),
            vtep: Ipv4Addr::new(198, 18, 0, 1),
            expires_unix_ms: u64::MAX,
        }
    }

    #[test]
    fn lowest_free_subnet_fills_gaps_first() {
        let pool = net("10.244.0.0/16");
        assert_eq!(
            choose_subnet(pool, 24, [], None),
            Some(net("10.244.0.0/24"))
        );
        let taken = [net("10.244.0.0/24"), net("10.244.2.0/24")];
        assert_eq!(
            choose_subnet(pool, 24, taken, None),
            Some(net("10.244.1.0/24"))
        );
        let taken = [net("10.244.1.0/24"), net("10.244.0.0/24")];
        assert_eq!(
            choose_subnet(pool, 24, taken, None),
            Some(net("10.244.2.0/24"))
        );
        // Subnets of length 26 in a /24: four of them.
        let pool = net("10.9.9.0/24");
        assert_eq!(
            choose_subnet(pool, 26, [net("10.9.9.0/26")], None),
            Some(net("10.9.9.64/26"))
        );
    }

    #[test]
    fn prefer_is_taken_when_free_and_valid() {
        let pool = net("10.244.0.0/16");
        let taken = [net("10.244.0.0/24"), net("10.244.7.0/24")];
        assert_eq!(
            choose_subnet(pool, 24, taken, Some(net("10.244.9.0/24"))),
            Some(net("10.244.9.0/24"))
        );
        // Taken: the lowest free instead.
        assert_eq!(
            choose_subnet(pool, 24, taken, Some(net("10.244.7.0/24"))),
            Some(net("10.244.1.0/24"))
        );
        // Outside the pool, wrong length, host bits: ignored.
        for stale in ["10.245.3.0/24", "10.244.3.0/25", "10.244.3.7/24"] {
            assert_eq!(
                choose_subnet(pool, 24, taken, Some(net(stale))),
                Some(net("10.244.1.0/24")),
                "{stale}"
            );
        }
    }

    #[test]
    fn exhaustion_and_whole_pool_subnets() {
        let pool = net("10.1.0.0/23");
        let taken = [net("10.1.0.0/24"), net("10.1.1.0/24")];
        assert_eq!(choose_subnet(pool, 24, taken, None), None);
        // Leases outside the pool do not count.
        assert_eq!(
            choose_subnet(pool, 24, [net("10.2.0.0/24")], None),
            Some(net("10.1.0.0/24"))
        );
        // A pool that is one host's subnet.
        let pool = net("10.3.0.0/24");
        assert_eq!(subnet_count(pool, 24), 1);
        assert_eq!(choose_subnet(pool, 24, [], None), Some(pool));
        assert_eq!(choose_subnet(pool, 24, [pool], None), None);
        // The top of the address space.
        let pool = net("255.255.255.0/24");
        assert_eq!(
            choose_subnet(
                pool,
                30,
                [net("255.255.255.0/30")],
                Some(net("255.255.255.252/30"))
            ),
            Some(net("255.255.255.252/30"))
        );
        assert_eq!(subnet_count(net("10.0.0.0/8"), 30), 1 << 22);
    }

    #[test]
    fn vni_is_the_lowest_unused_from_one() {
        assert_eq!(lowest_free_vni([]), Some(1));
        assert_eq!(lowest_free_vni([1, 2, 4]), Some(3));
        assert_eq!(lowest_free_vni([2, 3]), Some(1));
        assert_eq!(lowest_free_vni([0, 1]), Some(2));
        assert_eq!(lowest_free_vni(1..=MAX_VNI), None);
    }

    #[test]
    fn definitions_are_checked() {
        for (pool, len) in [
            ("10.244.0.7/16", 24),
            ("10.0.0.0/7", 24),
            ("10.244.0.0/16", 15),
            ("10.244.0.0/16", 31),
        ] {
            let err = check_definition("ov", net(pool), len, None).unwrap_err();
            assert!(
                matches!(err, ClusterError::InvalidNetwork { .. }),
                "{pool} /{len}: {err}"
            );
        }
        assert!(check_definition("a/b", net("10.244.0.0/16"), 24, None).is_err());
        assert!(check_definition("ov", net("10.244.0.0/16"), 24, Some(10)).is_err());
        assert!(check_definition("ov", net("10.244.0.0/16"), 16, Some(1450)).is_ok());
        let err = check_definition("ov", net("10.244.0.7/16"), 24, None).unwrap_err();
        assert!(err.to_string().contains("10.244.0.0/16"), "{err}");
    }

    #[test]
    fn define_is_idempotent_and_names_conflicts() {
        let existing = [
            overlay("a", "10.244.0.0/16", 1),
            overlay("c", "10.246.0.0/16", 3),
        ];
        assert_eq!(
            define(&existing, "b", net("10.245.0.0/16"), 24, Some(1400)).unwrap(),
            Definition::New(OverlayNetwork {
                name: "b".into(),
                pool: net("10.245.0.0/16"),
                subnet_len: 24,
                vni: 2,
                mtu: Some(1400),
            })
        );
        assert_eq!(
            define(&existing, "a", net("10.244.0.0/16"), 24, None).unwrap(),
            Definition::Stored(existing[0].clone())
        );
        let err = define(&existing, "a", net("10.247.0.0/16"), 26, Some(1400)).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ClusterError::NetworkConflict { .. }),
            "{text}"
        );
        for part in ["10.244.0.0/16", "10.247.0.0/16", "/26", "MTU none", "1400"] {
            assert!(text.contains(part), "{part} missing from: {text}");
        }
        let err = define(&existing, "d", net("10.246.128.0/17"), 24, None).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ClusterError::PoolOverlap { .. }), "{text}");
        assert!(
            text.contains("10.246.0.0/16") && text.contains(" c"),
            "{text}"
        );
        let err = define(&existing, "e", net("10.0.0.0/8"), 24, None).unwrap_err();
        assert!(matches!(err, ClusterError::PoolOverlap { .. }), "{err}");
    }

    #[test]
    fn a_host_keeps_its_lease_or_takes_a_free_subnet() {
        let network = OverlayNetwork {
            subnet_len: 24,
            ..overlay("ov", "10.244.0.0/22", 1)
        };
        let leases = [lease("10.244.0.0/24", "a"), lease("10.244.2.0/24", "b")];
        assert_eq!(
            plan_lease(&network, &leases, "b", Some(net("10.244.3.0/24"))).unwrap(),
            LeasePlan::Keep(leases[1].clone())
        );
        assert_eq!(
            plan_lease(&network, &leases, "c", None).unwrap(),
            LeasePlan::Take(net("10.244.1.0/24"))
        );
        assert_eq!(
            plan_lease(&network, &leases, "c", Some(net("10.244.3.0/24"))).unwrap(),
            LeasePlan::Take(net("10.244.3.0/24"))
        );
        let full = [
            lease("10.244.0.0/24", "a"),
            lease("10.244.1.0/24", "b"),
            lease("10.244.2.0/24", "c"),
            lease("10.244.3.0/24", "d"),
        ];
        let err = plan_lease(&network, &full, "e", None).unwrap_err();
        assert!(
            matches!(err, ClusterError::PoolExhausted { leased: 4, .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("pool exhausted"), "{err}");
    }

    #[test]
    fn network_identity_and_host_names() {
        let stored = overlay("ov", "10.244.0.0/16", 1);
        assert!(check_same_network(&stored, &stored).is_ok());
        let moved = overlay("ov", "10.245.0.0/16", 1);
        let err = check_same_network(&stored, &moved).unwrap_err();
        assert!(err.to_string().contains("10.245.0.0/16"), "{err}");
        assert!(check_same_network(&stored, &overlay("ov", "10.244.0.0/16", 2)).is_err());
        assert!(check_host("node-1.example").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(254)] {
            assert!(check_host(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(subnet_key(net("10.244.3.0/24")), "10.244.3.0-24");
        assert!(is_pool_subnet(
            net("10.244.0.0/16"),
            24,
            net("10.244.3.0/24")
        ));
        assert!(!is_pool_subnet(
            net("10.244.0.0/16"),
            24,
            net("10.244.3.0/25")
        ));
    }
}
